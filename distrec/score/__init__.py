"""Offline full-catalog scoring: the blocked top-N kernel and the Ray batch job."""
