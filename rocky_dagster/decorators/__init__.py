"""The decorators and builders that put a step under the guard."""
