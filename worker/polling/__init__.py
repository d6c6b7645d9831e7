"""The polling service: claim due tasks, poll them, record outcomes, run periodic jobs."""
