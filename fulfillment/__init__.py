"""The ``fulfillment`` command line: a thin dispatcher over the ingress, worker and tools."""
