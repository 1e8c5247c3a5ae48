"""The served model: its catalog and life cycle (load, warm up, serve, stop), how its config
becomes an engine, and what a call's input becomes before an engine sees it."""
