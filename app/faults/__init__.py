"""Fault injection for tests and demos (``faults.*``): dropouts, Byzantine sites, slow sites."""
