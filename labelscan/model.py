"""Safe checkpoint loading and the LAFTR-ready layer graph.

Every supported checkpoint format is reduced to one ATen graph (``torch.export``), and that
graph is rebuilt as an ``nn.Sequential`` of the few layer types LAFTR can model. Anything
else is refused with the offending layer named, before any statistics are computed.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import sys
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from labelscan.errors import LabelscanError, first_line

SUPPORTED_LAYERS = (
    "Linear, Conv2d, ReLU, Flatten, BatchNorm (eval), AvgPool2d, MaxPool2d, Dropout"
)


class ChannelAffine(nn.Module):
    """BatchNorm in eval mode: a fixed per-channel scale and shift (not trained by labelscan)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.view(view) + self.shift.view(view)


@dataclass
class LaftrNet:
    """A ReLU network as an ordered list of layers LAFTR can model.

    ``layers`` maps inputs of shape ``(B, *input_shape)`` to logits ``(B, num_outputs)``.
    Its parameters (weights and biases of Linear and Conv2d layers) are the θ that FSD
    and self-influence are measured over; BatchNorm statistics stay fixed.
    """

    layers: nn.Sequential
    input_shape: tuple[int, ...]
    num_outputs: int

    def params(self) -> dict[str, torch.Tensor]:
        """θ as a dict of detached tensors, the form ``torch.func`` works with."""
        return {name: p.detach() for name, p in self.layers.named_parameters()}

    def relu_indices(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, nn.ReLU)]

    def spec(self) -> list[dict]:
        """The architecture as JSON-able data (saved with the summary, rebuilt by ``from_spec``)."""
        return [_layer_spec(layer) for layer in self.layers]

    @classmethod
    def from_spec(
        cls,
        spec: list[dict],
        tensors: dict[str, torch.Tensor],
        input_shape: tuple[int, ...],
        num_outputs: int,
    ) -> "LaftrNet":
        layers = nn.Sequential(*(_layer_from_spec(s) for s in spec))
        layers.load_state_dict(tensors, strict=True)
        return cls(layers.eval().requires_grad_(False), tuple(input_shape), num_outputs)


def checkpoint_kind(path: Path) -> str:
    """'export', 'torchscript' or 'pickle', read from the archive's entries (not the suffix)."""
    if not path.exists():
        raise LabelscanError(f"model file {path} does not exist; check the path")
    if path.is_dir():
        raise LabelscanError(f"model path {path} is a folder; pass the checkpoint file itself")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise LabelscanError(
            f"model file {path} is not a readable PyTorch checkpoint ({exc}); "
            "save it with torch.export.save (.pt2) or torch.jit.save"
        ) from None
    if damaged is not None:
        raise LabelscanError(f"model file {path} is damaged (entry {damaged} fails its checksum); save it again")
    tails = {name.split("/", 1)[-1] for name in names}
    if "models/model.json" in tails or "archive_format" in tails:
        return "export"
    if "constants.pkl" in tails or any(t.startswith("code/") for t in tails):
        return "torchscript"
    if "data.pkl" in tails:
        return "pickle"
    raise LabelscanError(f"model file {path} is a zip archive but not a PyTorch checkpoint")


def load_model(
    path: str | Path,
    *,
    input_shape: tuple[int, ...] | None = None,
    trust_checkpoint: bool = False,
    arch: str | None = None,
) -> LaftrNet:
    """Load a checkpoint and rebuild it as a :class:`LaftrNet`.

    ``input_shape`` (without the batch dimension) is needed for TorchScript and pickled
    checkpoints, which do not record it; ``.pt2`` programs carry their own.
    Pickled modules and state dicts (``arch="module:factory"``) run code on load, so they
    are refused unless ``trust_checkpoint`` is set.
    """
    path = Path(path)
    kind = checkpoint_kind(path)
    if kind == "export":
        program = _load_export(path)
        recorded = _export_input_shape(program)
        if input_shape is not None and tuple(input_shape) != recorded:
            raise LabelscanError(
                f"--input-shape {input_shape} disagrees with the shape {recorded} recorded in {path}"
            )
        input_shape = recorded
        graph_module = program.module()
        probe_batch = _export_batch_size(program)
    else:
        if input_shape is None:
            raise LabelscanError(
                f"{path} does not record its input shape; pass --input-shape (e.g. 1,28,28)"
            )
        probe_batch = 2
        example = torch.zeros(probe_batch, *input_shape)
        if kind == "torchscript":
            graph_module = _torchscript_to_graph(path, example)
        else:
            if not trust_checkpoint:
                raise LabelscanError(
                    f"{path} is a pickle, which runs code when loaded; re-save it with "
                    "torch.export.save, or pass --trust-checkpoint if you trust its source"
                )
            graph_module = _pickle_to_graph(path, arch, example)
    net = _rebuild(graph_module, tuple(input_shape))
    _check_reproduces(net, graph_module, path, probe_batch)
    return net


def _load_export(path: Path) -> torch.export.ExportedProgram:
    try:
        with _quiet_torch():
            return torch.export.load(path)
    except Exception as exc:  # torch raises many types for a damaged archive
        raise LabelscanError(f"could not read the exported program {path}: {first_line(exc)}") from None


def _export_input_shape(program: torch.export.ExportedProgram) -> tuple[int, ...]:
    inputs = program.graph_signature.user_inputs
    if len(inputs) != 1:
        raise LabelscanError(f"the model takes {len(inputs)} inputs; labelscan needs exactly one")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == inputs[0])
    shape = node.meta["val"].shape
    try:
        return tuple(int(d) for d in shape[1:])
    except TypeError:
        raise LabelscanError("the model's input shape is dynamic beyond the batch dimension") from None


def _export_batch_size(program: torch.export.ExportedProgram) -> int:
    """A batch size the program accepts: its own if it was exported with a static one."""
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == program.graph_signature.user_inputs[0])
    size = node.meta["val"].shape[0]
    return size if isinstance(size, int) else 2


def _torchscript_to_graph(path: Path, example: torch.Tensor) -> torch.fx.GraphModule:
    from torch._export.converter import TS2EPConverter

    try:
        scripted = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise LabelscanError(f"could not read the TorchScript model {path}: {first_line(exc)}") from None
    try:
        with _quiet_torch():
            return TS2EPConverter(scripted, (example,)).convert().module()
    except Exception as exc:
        raise LabelscanError(
            f"could not trace the TorchScript model {path} on input shape {tuple(example.shape[1:])} "
            f"({first_line(exc)}); check --input-shape"
        ) from None


def _pickle_to_graph(path: Path, arch: str | None, example: torch.Tensor) -> torch.fx.GraphModule:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise LabelscanError(f"could not unpickle {path}: {first_line(exc)}") from None
    if isinstance(loaded, dict):
        if arch is None:
            raise LabelscanError(
                f"{path} holds a state dict; pass --arch module:factory to build the network"
            )
        module = _build_arch(arch)
        try:
            module.load_state_dict(loaded)
        except RuntimeError as exc:
            raise LabelscanError(f"the state dict in {path} does not fit --arch {arch}: {first_line(exc)}") from None
    elif isinstance(loaded, nn.Module):
        module = loaded
    else:
        raise LabelscanError(f"{path} holds a {type(loaded).__name__}, not a module or a state dict")
    try:
        with _quiet_torch():
            return torch.export.export(module.eval(), (example,)).module()
    except Exception as exc:
        raise LabelscanError(
            f"could not trace the model from {path} on input shape {tuple(example.shape[1:])}: "
            f"{first_line(exc)}"
        ) from None


def _build_arch(arch: str) -> nn.Module:
    """Call ``module:factory``; ``module`` is a dotted import path or a ``.py`` file."""
    module_name, _, factory_name = arch.partition(":")
    if not module_name or not factory_name:
        raise LabelscanError(f"--arch {arch!r} must look like package.module:factory or file.py:factory")
    try:
        if module_name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if spec is None or not Path(module_name).exists():
                raise ImportError(f"no file {module_name}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
        factory = getattr(module, factory_name)
    except (ImportError, AttributeError, SyntaxError) as exc:
        raise LabelscanError(f"could not import --arch {arch}: {first_line(exc)}") from None
    built = factory()
    if not isinstance(built, nn.Module):
        raise LabelscanError(f"--arch {arch} returned a {type(built).__name__}, not an nn.Module")
    return built


# ATen ops that are a no-op at inference.
_IDENTITY_OPS = {"dropout", "alpha_dropout", "feature_dropout", "clone", "contiguous", "detach"}


def _rebuild(graph_module: torch.fx.GraphModule, input_shape: tuple[int, ...]) -> LaftrNet:
    """Walk a chain of ATen calls and rebuild it as supported modules."""
    tensors = dict(graph_module.named_parameters()) | dict(graph_module.named_buffers())
    layers: list[nn.Module] = []
    current = None
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            current = node
            continue
        if node.op in ("get_attr", "call_module"):
            continue
        if node.op == "output":
            break
        if node.op != "call_function":
            raise _refusal(node)
        if not node.args or node.args[0] is not current:
            raise LabelscanError(
                f"layer {_layer_name(node)} does not follow the previous one in a single chain; "
                "labelscan needs a plain feed-forward network (no skip connections or branches)"
            )
        layer = _layer_for(node, tensors)
        if layer is not None:
            layers.append(layer)
        current = node
    probe = torch.zeros(1, *input_shape)
    layers_seq = nn.Sequential(*layers).eval().requires_grad_(False)
    with torch.no_grad():
        out = layers_seq(probe)
    if out.dim() != 2:
        raise LabelscanError(f"the model outputs shape {tuple(out.shape)}; labelscan needs (batch, classes) logits")
    return LaftrNet(layers_seq, input_shape, int(out.shape[1]))


def _layer_for(node: torch.fx.Node, tensors: dict[str, torch.Tensor]) -> nn.Module | None:
    op = node.target._opname if hasattr(node.target, "_opname") else str(node.target)
    args = node.args

    def tensor(arg):
        return None if arg is None else tensors[arg.target].detach().clone()

    if op == "linear":
        weight, bias = tensor(args[1]), tensor(args[2] if len(args) > 2 else None)
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        _assign(layer, weight, bias)
        return layer
    if op in ("conv2d", "convolution"):
        weight, bias = tensor(args[1]), tensor(args[2] if len(args) > 2 else None)

        def arg(i, default):
            return args[i] if len(args) > i else default

        if op == "convolution" and arg(6, False):
            raise _refusal(node, "transposed convolution")
        groups = arg(8, 1) if op == "convolution" else arg(6, 1)
        kernel, stride, dilation = tuple(weight.shape[2:]), _pair(arg(3, 1)), _pair(arg(5, 1))
        layer = nn.Conv2d(
            weight.shape[1] * groups, weight.shape[0], kernel, stride=stride,
            padding=_conv_padding(node, arg(4, 0), kernel, stride, dilation), dilation=dilation,
            groups=groups, bias=bias is not None,
        )
        _assign(layer, weight, bias)
        return layer
    if op in ("relu", "relu_"):
        return nn.ReLU()
    if op in ("batch_norm", "_native_batch_norm_legit_no_training"):
        weight, bias, mean, var = (tensor(a) for a in args[1:5])
        eps = args[7] if op == "batch_norm" else args[6]
        if op == "batch_norm" and args[5]:
            raise _refusal(node, "BatchNorm in training mode")
        scale = (weight if weight is not None else torch.ones_like(var)) / torch.sqrt(var + eps)
        shift = (bias if bias is not None else torch.zeros_like(mean)) - mean * scale
        return ChannelAffine(scale, shift)
    if op == "max_pool2d":
        kernel = list(args[1])
        stride = list(args[2]) if len(args) > 2 and args[2] else kernel
        padding = list(args[3]) if len(args) > 3 else [0, 0]
        dilation = list(args[4]) if len(args) > 4 else [1, 1]
        ceil_mode = args[5] if len(args) > 5 else False
        return nn.MaxPool2d(tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), ceil_mode=ceil_mode)
    if op == "avg_pool2d":
        kernel = list(args[1])
        stride = list(args[2]) if len(args) > 2 and args[2] else kernel
        padding = list(args[3]) if len(args) > 3 else [0, 0]
        ceil_mode = args[4] if len(args) > 4 else False
        count_include_pad = args[5] if len(args) > 5 else True
        if len(args) > 6 and args[6] is not None:
            raise _refusal(node, "AvgPool2d with divisor_override")
        return nn.AvgPool2d(tuple(kernel), tuple(stride), tuple(padding), ceil_mode, count_include_pad)
    if op == "flatten":
        start = args[1] if len(args) > 1 else 0
        end = args[2] if len(args) > 2 else -1
        if start != 1 or end != -1:
            raise _refusal(node, f"flatten({start}, {end})")
        return nn.Flatten()
    if op in ("view", "reshape", "_unsafe_view"):
        shape = list(args[1])
        if len(shape) == 2:
            return nn.Flatten()
        raise _refusal(node, f"reshape to {shape}")
    if op in _IDENTITY_OPS:
        return None
    raise _refusal(node)


def _conv_padding(node, padding, kernel, stride, dilation) -> tuple[int, int]:
    """Numeric padding; 'valid' is 0 and 'same' the symmetric padding it stands for, where there is one."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        if any(t % 2 for t in totals) or any(s != 1 for s in stride):
            raise _refusal(node, "asymmetric 'same' padding")
        return tuple(t // 2 for t in totals)
    return _pair(padding)


def _assign(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)


def _layer_name(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, kind = list(stack.values())[-1]
        kind_name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
        return f"'{path}' ({kind_name.rsplit('.', 1)[-1]})"
    return f"'{node.name}' ({node.target})"


def _refusal(node: torch.fx.Node, what: str | None = None) -> LabelscanError:
    what = what or getattr(node.target, "__name__", str(node.target))
    return LabelscanError(
        f"layer {_layer_name(node)} uses {what}, which LAFTR cannot model; "
        f"labelscan supports {SUPPORTED_LAYERS}"
    )


def _check_reproduces(net: LaftrNet, graph_module: torch.fx.GraphModule, path: Path, batch: int) -> None:
    """The rebuilt layers must compute what the checkpoint computes (NaN where it does: the
    data pass reports a model that overflows)."""
    probe = torch.randn(batch, *net.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        try:
            expected = graph_module(probe)
        except Exception as exc:
            raise LabelscanError(f"the model in {path} fails on a probe input: {first_line(exc)}") from None
        expected = expected[0] if isinstance(expected, (tuple, list)) else expected
        got = net.layers(probe)
    if expected.shape != got.shape or not torch.allclose(expected, got, rtol=1e-4, atol=1e-4, equal_nan=True):
        raise LabelscanError(
            f"labelscan could not rebuild {path} as a feed-forward ReLU network; "
            "export a plain nn.Sequential-style model"
        )


def _layer_spec(layer: nn.Module) -> dict:
    if isinstance(layer, nn.Linear):
        return {"type": "Linear", "in": layer.in_features, "out": layer.out_features, "bias": layer.bias is not None}
    if isinstance(layer, nn.Conv2d):
        return {
            "type": "Conv2d", "in": layer.in_channels, "out": layer.out_channels,
            "kernel": list(layer.kernel_size), "stride": list(layer.stride), "padding": list(layer.padding),
            "dilation": list(layer.dilation), "groups": layer.groups, "bias": layer.bias is not None,
        }
    if isinstance(layer, ChannelAffine):
        return {"type": "ChannelAffine", "channels": layer.scale.numel()}
    if isinstance(layer, nn.MaxPool2d):
        return {"type": "MaxPool2d", "kernel": _pair(layer.kernel_size), "stride": _pair(layer.stride),
                "padding": _pair(layer.padding), "dilation": _pair(layer.dilation), "ceil_mode": layer.ceil_mode}
    if isinstance(layer, nn.AvgPool2d):
        return {"type": "AvgPool2d", "kernel": _pair(layer.kernel_size), "stride": _pair(layer.stride),
                "padding": _pair(layer.padding), "ceil_mode": layer.ceil_mode,
                "count_include_pad": layer.count_include_pad}
    return {"type": type(layer).__name__}


def _layer_from_spec(spec: dict) -> nn.Module:
    kind = spec["type"]
    if kind == "Linear":
        return nn.Linear(spec["in"], spec["out"], bias=spec["bias"])
    if kind == "Conv2d":
        return nn.Conv2d(spec["in"], spec["out"], tuple(spec["kernel"]), tuple(spec["stride"]),
                         tuple(spec["padding"]), tuple(spec["dilation"]), spec["groups"], spec["bias"])
    if kind == "ChannelAffine":
        return ChannelAffine(torch.ones(spec["channels"]), torch.zeros(spec["channels"]))
    if kind == "MaxPool2d":
        return nn.MaxPool2d(tuple(spec["kernel"]), tuple(spec["stride"]), tuple(spec["padding"]),
                            tuple(spec["dilation"]), ceil_mode=spec["ceil_mode"])
    if kind == "AvgPool2d":
        return nn.AvgPool2d(tuple(spec["kernel"]), tuple(spec["stride"]), tuple(spec["padding"]),
                            spec["ceil_mode"], spec["count_include_pad"])
    if kind == "ReLU":
        return nn.ReLU()
    if kind == "Flatten":
        return nn.Flatten()
    raise LabelscanError(f"the summary names an unknown layer type {kind!r}; re-run labelscan summarize")


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return tuple(value) * 2 if len(value) == 1 else tuple(value)
    return (value, value)


@contextlib.contextmanager
def _quiet_torch():
    """Tracing logs and warns freely; the user gets our one-line error instead."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
