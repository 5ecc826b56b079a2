"""Developer tools run from the command line (``python -m speeder_rt.tools.NAME``); nothing in the library imports them."""
