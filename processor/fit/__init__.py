"""Fitting the site-specific parts of the ensemble from the site's own labelled studies.

``fit-head`` (supervised head on stored CT-CLIP latents), ``fit-fusion`` (LightGBM over stored
features) and ``fit-anomaly`` (a 2-D diffusion model on normal studies). Fit commands read only
SQLite (and a labels CSV, or a folder of normal studies) and write under ``settings.weights``.
Keep this package's ``__init__`` free of imports: the CLI imports :mod:`processor.fit.commands`
on every start.
"""
