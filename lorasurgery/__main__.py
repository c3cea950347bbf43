"""`python -m lorasurgery` runs the same command line as the `lorasurgery` script."""

from lorasurgery.cli import main

if __name__ == "__main__":
    main()
