"""Storage backends of the accounting layer, one module per engine.

Import them through :func:`conclave.accounting.open_accounting` or directly
(``from conclave.accounting.backends.redis import RedisBudgetStore``); the
drivers (psycopg, redis) are imported only by the module that needs them.
"""
