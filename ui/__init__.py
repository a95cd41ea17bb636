"""The HSR Workbench web app: gradio layout, handlers, figures and session state.

``ui`` adds gradio and plotly on top of ``hsr_core`` (which imports neither); ``app.py`` only
builds the demo from here and launches it.
"""
