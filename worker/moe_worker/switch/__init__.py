"""One rank's side of a plan switch that does not stop serving (`switcher`)."""
