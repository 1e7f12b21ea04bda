"""The built-in convscale plugins (installed as ``convscale_plugins``).

Each subpackage is a plugin registered through the ``convscale`` entry-point group of this distribution, exactly like
a third-party plugin: the core never imports or names them.
"""
