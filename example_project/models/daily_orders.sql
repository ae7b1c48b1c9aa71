-- materialized: table
-- description: Orders and revenue per day.
SELECT substr(created_at, 1, 10) AS day, count(*) AS orders, round(sum(amount), 2) AS revenue
FROM stg_orders
GROUP BY substr(created_at, 1, 10)
