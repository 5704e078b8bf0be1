from tts_gateway.cli import app

app()
