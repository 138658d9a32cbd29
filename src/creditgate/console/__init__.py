"""The console's files (HTML, CSS, JavaScript modules), served as they are by the
worker at ``/console/`` (``creditgate.api.console``): no build step, no external asset."""
