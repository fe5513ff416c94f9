"""``timi app``: TIMI in the browser (Gradio).

* :mod:`timi.webapp.masks` - instance masks from the picture: proposed (alpha components split by
  colour), merged, split, removed, painted; label maps and their overlays;
* :mod:`timi.webapp.sam` - Segment-Anything click/box prompts -> masks (``--sam-checkpoint``);
* :mod:`timi.webapp.run` - the run: the masks' preview with ``timi inspect``'s checks and picture,
  and ``timi generate``'s :func:`timi.generate.generate` in a folder of its own;
* :mod:`timi.webapp.ui` - the page; :mod:`timi.webapp.cli` - the ``timi app`` command.

Nothing of the method is re-implemented here: the page calls the command line's functions.
"""
