def test_mariadb_fixture_serves_queries(mariadb):
    conn = mariadb.connect()
    with conn.cursor() as cur:
        cur.execute("SELECT VERSION()")
        (version,) = cur.fetchone()
    assert "MariaDB" in version
