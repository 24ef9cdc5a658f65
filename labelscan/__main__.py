from labelscan.cli import app

app(prog_name="labelscan")
