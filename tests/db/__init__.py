"""Schema tests: migrations on the real PostgreSQL, and their TimescaleDB branch on PGlite + TimescaleDB."""

# The schema as rows of text, for comparing a database before and after something that should not
# change it.  Read from the catalog (not pg_dump) so that it also runs against the embedded PostgreSQL,
# whose major version differs from the machine's pg_dump, and against PGlite.  Only the `public`
# schema: TimescaleDB's chunks live in its own schemas and are not part of our schema.
SCHEMA_SNAPSHOT_SQL = """
SELECT 'relation', c.relname, c.relkind::text, coalesce(pg_get_expr(c.relpartbound, c.oid), '')
  FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace
UNION ALL
SELECT 'column', c.relname || '.' || a.attname, format_type(a.atttypid, a.atttypmod),
       a.attnotnull::text || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE c.relnamespace = 'public'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'constraint', conrelid::regclass::text || '.' || conname, contype::text, pg_get_constraintdef(oid)
  FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'index', indexname, tablename, indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL
SELECT 'trigger', t.tgrelid::regclass::text || '.' || t.tgname, '', pg_get_triggerdef(t.oid)
  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
 WHERE c.relnamespace = 'public'::regnamespace AND NOT t.tgisinternal
UNION ALL
SELECT 'function', p.proname, pg_get_function_identity_arguments(p.oid), md5(pg_get_functiondef(p.oid))
  FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace AND p.prokind IN ('f', 'p')
UNION ALL
SELECT 'migration', version::text, name, '' FROM schema_migrations
UNION ALL
SELECT 'meta', key, value, '' FROM iotjx_meta
UNION ALL
SELECT 'cities', count(*)::text, '', '' FROM cities
ORDER BY 1, 2, 3, 4"""
