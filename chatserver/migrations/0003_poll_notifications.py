"""PostgreSQL tells every server process, at the commit, which devices' chats changed
(chatserver/poll_cache.py): a chat row's change names its device; a region's change, or a
TRUNCATE, may touch every chat ('*'). Nothing on other databases."""

from typing import Any

from django.db import migrations

CREATE = [
    """
CREATE FUNCTION chatserver_notify_polls() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_LEVEL = 'STATEMENT' THEN
        PERFORM pg_notify('chatserver_polls', '*');
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM pg_notify('chatserver_polls', OLD.device_id);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM pg_notify('chatserver_polls', NEW.device_id);
    END IF;
    RETURN NULL;
END
$$""",
    """CREATE TRIGGER chatserver_chat_polls AFTER INSERT OR UPDATE OR DELETE ON chatserver_chat
    FOR EACH ROW EXECUTE FUNCTION chatserver_notify_polls()""",
    """CREATE TRIGGER chatserver_chat_truncate_polls AFTER TRUNCATE ON chatserver_chat
    FOR EACH STATEMENT EXECUTE FUNCTION chatserver_notify_polls()""",
    """CREATE TRIGGER chatserver_region_polls AFTER UPDATE OR DELETE OR TRUNCATE ON chatserver_region
    FOR EACH STATEMENT EXECUTE FUNCTION chatserver_notify_polls()""",
]

DROP = [
    "DROP TRIGGER chatserver_region_polls ON chatserver_region",
    "DROP TRIGGER chatserver_chat_truncate_polls ON chatserver_chat",
    "DROP TRIGGER chatserver_chat_polls ON chatserver_chat",
    "DROP FUNCTION chatserver_notify_polls()",
]


def _on_postgresql(statements: list[str]) -> Any:
    def run(apps: Any, schema_editor: Any) -> None:
        if schema_editor.connection.vendor == "postgresql":
            for statement in statements:
                schema_editor.execute(statement, params=None)

    return run


class Migration(migrations.Migration):
    dependencies = [("chatserver", "0002_uploads")]

    operations = [migrations.RunPython(_on_postgresql(CREATE), _on_postgresql(DROP))]
