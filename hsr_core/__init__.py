"""HSR Workbench core: Ships head attribution, Wanda pruning and Hierarchical Safety Realignment.

No UI library is imported here; the app (``ui/``) and the command line (``python -m hsr_core``)
both call ``hsr_core.pipeline``.
"""

__version__ = "0.1.0"
