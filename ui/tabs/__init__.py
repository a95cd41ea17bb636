"""The app's tabs, one room each: its components (``build``), its events (``wire``) and its thin
handlers. A tab imports the plumbing (``ui.events``, ``ui.session``, ``ui.workbench``,
``ui.figures``) and the core's door (``hsr_core.pipeline``, ``hsr_core.config``), never
another tab; ``ui.layout`` lists them in order."""
