-- materialized: table
-- description: Each order with what was paid for it (payments arrive as dropped files).
SELECT o.order_id, o.amount, round(coalesce(sum(p.amount), 0), 2) AS paid, count(p.payment_id) AS payments
FROM stg_orders AS o
LEFT JOIN payments AS p ON p.order_id = o.order_id
GROUP BY o.order_id, o.amount
