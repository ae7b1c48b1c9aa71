-- materialized: view
-- description: Orders as replicated from the shop, with friendlier names.
SELECT id AS order_id, customer_id, amount, status, created_at, updated_at
FROM raw_orders
