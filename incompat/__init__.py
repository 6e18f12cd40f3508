"""incompat: find and remove backdoor-poisoned samples by incompatibility clustering (ISPL+B).

The package is the engine: NumPy and torch only. Prefect, MLflow and DVC live in tasks/ and flows/.
"""

__version__ = "0.1.0"
