"""HSR Workbench: the Gradio app (also the Hugging Face Spaces entry point, ``app_file: app.py``).

``demo`` is built at import without loading a model; ``python app.py`` serves it. The server
address comes from gradio's own ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` variables and
the cache from ``HSR_CACHE_DIR``.
"""

from ui.layout import build_demo, launch_kwargs

demo = build_demo()

if __name__ == "__main__":
    demo.launch(**launch_kwargs())
