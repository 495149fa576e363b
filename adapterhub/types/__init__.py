"""The built-in adapter types. Each module is an ordinary plugin, found through the
`adapterhub.adapter_types` entry points in pyproject.toml like any outside one."""
