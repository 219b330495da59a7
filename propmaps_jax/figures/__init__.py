"""The project's figures as library functions, so that an installed user makes the
figures the experiments make: each function takes the records a library study
returns and gives back a matplotlib figure (`locality`: success by distance, by
fragility stratum, vulnerability maps). Matplotlib is an optional dependency: it is
imported by these modules only, never by `import propmaps_jax`.
"""
