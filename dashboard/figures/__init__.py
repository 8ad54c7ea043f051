"""The dashboard's figures, as plotly JSON (plain dicts).

- ``factory``: :func:`~dashboard.figures.factory.figure`, the one place for the rules of axes,
  titles and legends, and the traces it is made of;
- ``declare``: how a figure is declared once (its statistics, from bncore.statistics) and how
  the declaration gives both the figure and its live spec (what assets/live.js extends it with);
- ``run``: the run view's figures, each declared once;
- ``compare``: runs overlaid; ``experiment``: an experiment's result panels.
"""
