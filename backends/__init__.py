"""Backends: one module (or package) each, a Capability record plus forward()."""
