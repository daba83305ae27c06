from proxy import create_app

app = create_app()
