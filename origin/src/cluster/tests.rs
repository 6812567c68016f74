//! Unit tests of the membership: owners agree across members, suspicion and recovery,
//! settings validation, `dns:` members, and the tag listing the repair pass walks.

use super::*;

fn settings(n: usize, me: usize) -> Settings {
    let members: Vec<String> = (0..n).map(|i| format!("http://o{i}:5000/")).collect();
    Settings {
        me: members[me].clone(),
        members,
        replicas: 2,
        key: RingKey::default(),
        token: None,
        handoff_grace: Duration::from_secs(3600),
        tls: None,
    }
}

#[test]
fn every_member_computes_the_same_owners() {
    let digest = Digest::of(b"blob");
    let owners: Vec<Vec<String>> = (0..3)
        .map(|me| {
            let c = Cluster::new(settings(3, me)).expect("cluster");
            c.blob_owners(&digest)
        })
        .collect();
    assert_eq!(owners[0].len(), 2);
    assert!(owners.iter().all(|o| *o == owners[0]), "{owners:?}");
}

#[test]
fn a_suspect_member_is_skipped_until_its_probes_pass() {
    let c = Cluster::new(settings(3, 0)).expect("cluster");
    let digest = (0..100u32)
        .map(|i| Digest::of(&i.to_le_bytes()))
        .find(|d| !c.owns_blob(d))
        .expect("a blob this member does not own");
    let owners = c.blob_owners(&digest);
    assert!(!c.take_change());
    c.suspect(&owners[0]);
    assert!(c.take_change(), "a member going down calls for a repair pass");
    assert!(!c.take_change());
    c.suspect(&owners[0]);
    assert!(!c.take_change(), "already down: nothing changed");
    let now = c.blob_owners(&digest);
    assert!(!now.contains(&owners[0]));
    assert_eq!(now.len(), 2, "the next member takes its place");
    c.suspect(c.me());
    assert!(c.is_up(c.me()), "this origin is never down to itself");
}

#[test]
fn self_must_be_a_member() {
    let mut s = settings(3, 0);
    s.me = "http://elsewhere:5000".into();
    assert!(matches!(Cluster::new(s), Err(ClusterError::NotAMember(_))));
    let mut s = settings(3, 0);
    s.replicas = 0;
    assert!(matches!(Cluster::new(s), Err(ClusterError::NoReplicas)));
    let mut s = settings(3, 0);
    s.members.push("origin-9:5000".into());
    assert!(matches!(Cluster::new(s), Err(ClusterError::BadMember(_))));
}

#[tokio::test]
async fn dns_members_are_every_address_of_the_name() {
    let mut s = settings(1, 0);
    s.members = vec!["dns:localhost:5000".into()];
    s.me = "http://10.9.9.9:5000".into();
    let c = Cluster::new(s).expect("cluster");
    assert_eq!(c.members().len(), 1, "only itself until resolved");
    c.resolve().await;
    let ids: Vec<String> = c.members().into_iter().map(|(id, _)| id).collect();
    assert!(ids.contains(&"http://127.0.0.1:5000".to_owned()), "{ids:?}");
    assert!(ids.contains(&"http://10.9.9.9:5000".to_owned()), "{ids:?}");
}

#[test]
fn tags_are_listed_with_their_repository() {
    let dir = tempfile::tempdir().expect("tmp");
    for (name, tag) in [("app", "v1"), ("team/app", "v2"), ("team/app", "latest")] {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).expect("dir");
        std::fs::write(d.join(format!("{tag}.tag")), "x").expect("tag");
    }
    assert_eq!(
        crate::tags::list_tag_files(dir.path()),
        vec![
            ("app".to_owned(), "v1".to_owned()),
            ("team/app".to_owned(), "latest".to_owned()),
            ("team/app".to_owned(), "v2".to_owned())
        ]
    );
}
