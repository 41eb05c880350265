"""ge_book: the companion book's tooling (``pip install -e .[book]``).

The notebook runner (papermill execution under a profile), the generated book pages and the
provenance of each run. The science package ``ge_utils`` never imports it.
"""

__version__ = "0.1.0"
