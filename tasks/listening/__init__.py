"""The blind listening test: people compare two models' instrumentals on the test vocals, and their votes
become evidence for promotion.

    clips.py   the audio: each model's output on the first test chunks (evaluation's outputs reused, the rest
               generated the way evaluation does), mixed with the vocal
    store.py   trials (what a listener is shown, in which A/B order), votes, invitations (hashed tokens) and
               refused attempts, in SQLite under .v2m/ or the team's PostgreSQL: the only module with SQL
    stats.py   win rate with a Wilson interval, Bradley-Terry for more than two models, listener agreement
    gate.py    the `human_preference` promotion gate (counted votes only: invited or proxy-signed-in listeners,
               each one's weight capped), and the results recorded on the model version
    app.py     the FastAPI router (page + JSON API + audio), mountable at /listen, and `v2m listen`
    lazy.py    the listening set of a server that starts before its clips exist (prepared in the background)
    report.py  the results as the comparison report shows them (read back from the registry)
"""
