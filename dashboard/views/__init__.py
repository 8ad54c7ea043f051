"""The dashboard's views, one module each, with its layout and its callbacks as top-level
functions (declared with dashboard.wiring.callback, bound to the service at mount):

- ``address``: which view is open: the runs list's Open and Compare, and the address bar;
- ``runs``: the runs list, and acting on runs (cancel, delete);
- ``run``: one run, drawn and fed live;
- ``doctor``: the run's Diagnosis panel (the BN doctor), silencing, the step a link marks;
- ``compare``: runs overlaid;
- ``launch``: the launch form and its errors, beside their fields;
- ``experiments``: the literature's experiments, and their results;
- ``calculator``: batch normalization, step by step, on a batch one types.

``common`` holds what several share.
"""
