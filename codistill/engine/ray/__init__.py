"""What only runs on Ray: the Ray runner (`runner.py`) and the layouts it runs (`layouts.py`:
one group, or peers apart), the functions run inside Ray Train workers (`workers.py`),
placement and shared-storage checks (`placement.py`), the evaluation board of peers apart
(`evaluation_board.py`), the registrations that travel to every worker and trial
(`registrations.py`), and connecting to a cluster or starting the private instance
(`connect.py`). The rest of the engine imports no `ray` (a contract `lint-imports` holds): the
loop, the jobs, checkpoints and the local runner run the same with or without it."""
