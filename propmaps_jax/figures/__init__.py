"""The project's figures as library functions, so that an installed user draws them.

`propagation`: one attack's propagation maps (paper figures 2-6), the mean maps
over many attacks (figures 7/8), the layer means (figure 9) and the distance of the
attacked pixels from the centre; `locality`: success by distance, by fragility
stratum, vulnerability maps; `salience`: the salience study's examples, capture
curves and ROC. Each function takes host arrays or the records a library study
returns and gives back a matplotlib figure; matplotlib is an optional dependency,
imported by these modules only (never by `import propmaps_jax`).
"""

from propmaps_jax._lazy import submodule_getattr  # noqa: E402

__getattr__ = submodule_getattr(__name__, __path__)
