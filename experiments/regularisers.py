"""Deprecated alias: ``python -m experiments.regularisers`` runs :mod:`experiments.regularizers`
(the American spelling, as :mod:`jaxsparse.regularizers`) after a DeprecationWarning."""

from __future__ import annotations

import sys
import warnings

from experiments import regularizers


def main(argv=None) -> list[dict]:
  warnings.warn("experiments.regularisers is deprecated; use python -m experiments.regularizers",
                DeprecationWarning, stacklevel=2)
  return regularizers.main(argv)


if __name__ == "__main__":
  main(sys.argv[1:])
