"""Tools for trying and developing Taskman: the dev server, the demo, local PostgreSQL servers."""
