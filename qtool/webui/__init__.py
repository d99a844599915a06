"""`qtool webui`: quantize, compare, fine-tune, chat, merge and export from a browser (Gradio).

Modules: `jobs` runs long work as background `qtool` processes that outlive the page (and the
server), `forms` turns form values into the CLI's arguments and reads results back, `chat`
streams answers from a model held in the server, `app` lays out the page. Gradio is an extra:
`pip install 'qtool[webui]'`.
"""
