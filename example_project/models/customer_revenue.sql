-- materialized: table
-- description: Revenue and order count per customer (returned orders excluded).
SELECT c.id AS customer_id, c.name, c.country,
       count(o.order_id) AS orders,
       round(coalesce(sum(o.amount), 0), 2) AS revenue
FROM raw_customers AS c
LEFT JOIN stg_orders AS o ON o.customer_id = c.id AND o.status != 'returned'
GROUP BY c.id, c.name, c.country
