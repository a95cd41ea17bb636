"""The HSR Workbench web app: the page (``layout``), one room per tab (``tabs``), the shared
plumbing (``events``, ``session``, ``workbench``) and the pure figures (``figures``).

``ui`` adds gradio and plotly on top of ``hsr_core`` (which imports neither) and reaches the
core through ``hsr_core.pipeline`` and ``hsr_core.config`` only; ``app.py`` only builds the demo
from here and launches it.
"""
