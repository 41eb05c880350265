"""ge_utils: measure gradient entanglement in margin-based preference optimization.

Companion package of *A Common Pitfall of Margin-based Language Model Alignment: Gradient
Entanglement* (Yuan et al., ICLR 2025).
"""

__version__ = "0.1.0"
