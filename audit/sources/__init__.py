"""Where a spec's cases come from: typed by hand under ``cases:``, or read from a golden set."""
