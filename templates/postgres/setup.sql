-- Managed by dstack-vpn: rendered from templates/postgres/setup.sql, run on the primary by the
-- last member's step. Roles get SCRAM verifiers, never passwords; nothing is ever dropped.
\set ON_ERROR_STOP on
SET client_min_messages = warning;
{% for user in users %}
SELECT 'CREATE ROLE {{ user }} LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{{ user }}')\gexec
{% endfor %}
{% for user, verifier in verifiers | dictsort %}
ALTER ROLE {{ user }} PASSWORD '{{ verifier }}';
{% endfor %}
{% for db in databases %}
SELECT 'CREATE DATABASE {{ db.name }} OWNER {{ db.owner }}' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{{ db.name }}')\gexec
ALTER DATABASE {{ db.name }} OWNER TO {{ db.owner }};
{% endfor %}
