"""conngeo: connector geometry of vision-language models.

The library knows nothing of DVC or params.yaml; stage scripts under stages/ read those and call in here.
"""

__version__ = "0.1.0"
