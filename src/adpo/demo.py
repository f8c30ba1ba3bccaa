"""``python -m adpo.demo`` (what ``make demo`` runs): the program lives in :mod:`adpo.cli.demo`."""

if __name__ == "__main__":
    from .cli.demo import main

    raise SystemExit(main())
