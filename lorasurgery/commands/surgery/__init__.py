"""`resize` and `combine` (resize.py, combine.py) over what they share once each module's update is known
in factored form (surgery.py: ranks, output, report). See docs/resize.md and docs/combine.md."""
