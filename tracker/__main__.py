from tracker.cli.app import app

app(prog_name="tracker")
