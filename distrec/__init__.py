"""distrec: PEFT-tuned language models for recommendation, trained across workers,
scored over the whole catalog with diversity constraints.

The flow, one module (or package) per arrow:
    data (prepare) -> models -> train -> score (+ diversity) -> evaluate
"""

__version__ = "0.1.0"
