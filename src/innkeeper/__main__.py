"""`python -m innkeeper` runs the CLI (the tests start servers this way)."""

from innkeeper.cli import main

if __name__ == "__main__":
    main()
