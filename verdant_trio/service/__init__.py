"""The server as a program: daemon, configuration, command line, logs, systemd notify, health,
metrics, backup, profiles and the embedding API. Imports every layer below."""
