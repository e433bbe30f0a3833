"""The REST gateway: jobs (train, tune, eval, pipeline) as Ray Jobs, deployments on Ray Serve, API keys, a job store
(SQLite by default, PostgreSQL by URL). Layering: api -> cluster / service -> flm; nothing below imports api."""
